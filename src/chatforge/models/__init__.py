"""Model families, one folder each (``config``, ``model``, ``pipeline``, ``step``); see chatforge.families."""
