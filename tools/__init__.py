"""Development tools, not part of the installed package: the real-model fixture (`real_models.py`), the docs
generator (`config_reference.py`, `docs_hooks.py`) and the figure and screenshot scripts. Run from the repository
root (`python -m tools.real_models`); the tests reach them through pytest's `pythonpath = ["."]`."""
