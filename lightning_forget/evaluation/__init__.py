"""Measuring a model after forgetting: accuracy, membership inference, integrity evidence; builds on the plugin."""
