"""The student: a teacher cut to fewer layers.

maps.py (layer maps from the depths and a strategy), importance.py (block influence),
search.py (cuts scored without building them; greedy layer search), build.py (copying the
kept layers into a student), cut.py (the one cut that distill and init-student run).
"""
