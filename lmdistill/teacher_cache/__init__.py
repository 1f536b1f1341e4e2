"""Teacher soft targets computed once and stored next to the token shards.

``lmdistill cache-teacher`` runs the teacher once over the training blocks of a prepared
folder and stores, for every input position, its ``k`` largest logits (16-bit), their token
ids and the log-sum-exp of the logits over the whole vocabulary at each temperature asked
for; ``lmdistill distill --teacher-cache DIR`` then trains without the teacher's weights,
with the sparse KL of :mod:`lmdistill.loss.sparse`. ``docs/teacher_cache.md`` is the guide.

- :mod:`.format`: the file format (header, records, part names, checksums) and :func:`~.format.read_header`.
- :mod:`.reader`: :class:`~.reader.TeacherCache`, a complete verified cache read block by block.
- :mod:`.build`: :func:`~.build.build_teacher_cache`, a resumable build of one part.

Nothing is re-exported here: import from the module that holds the name.
"""
