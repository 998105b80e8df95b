"""The selection report: scoring examples with a trainer and writing the report (`collect.py`), and rendering the
kept tokens as HTML and SVG (`visualize.py`)."""
