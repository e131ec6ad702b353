"""bnzoo's library code beyond layers and models: data, training runs, export, CLI helpers.

`train.py` and `evaluate.py` stay thin; everything they do is a function here that tests call too.
"""
