"""The app behind ``python run.py``: settings, datasets and models it builds, runs, cache, report; the top layer."""
