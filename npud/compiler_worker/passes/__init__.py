"""One module per compiler pass; :mod:`npud.compiler_worker.pipeline` lists them in order."""
