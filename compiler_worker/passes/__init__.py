"""One module per compiler pass; :mod:`compiler_worker.pipeline` lists them in order."""
