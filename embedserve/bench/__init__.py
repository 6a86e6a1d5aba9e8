"""`embedserve bench`: the load generator and its corpus, shipped with the server so users can measure
their own deployment; the side-by-side scripts in the repository's bench/ folder build on it."""
