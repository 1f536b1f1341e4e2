"""The run report: ``write.write_report`` turns a run directory into ``report.md`` with plots
(``plots``), the training summary (``run``) and the evaluation, bench and demo results
(``results``), each result kind drawn by its one renderer."""
