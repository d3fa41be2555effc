"""HTTP service around the evaluation engine: uploads, job queue, streamed reports, web page."""
