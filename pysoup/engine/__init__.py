"""The merge pipeline: open (pysoup.io) -> plan (plan.py: every output tensor's sources, op and dtype, checked up
front) -> execute (execute.py: chunks through the backend's ops into the output buffer) -> commit (pysoup.io.writer),
and what the merge reports (report.py, progress.py)."""
