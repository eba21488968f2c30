"""medseg's tests: a regular package, so that ``tests.conftest`` is this folder's even when another
distribution installed a top-level ``tests`` package into site-packages (rt-utils does)."""
