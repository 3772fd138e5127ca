"""Measuring tools for voxlive, shipped beside the engine and kept out of it.

``bench`` (speed; ``voxlive bench``), ``streams`` (many streams through the server's engine;
``voxlive bench --streams``), ``accuracy`` (quantized against float; ``python -m
voxlive_bench.accuracy``) and ``reference`` (the transformers implementation on voxlive's
weights: the test-suite's reference, and ``voxlive bench --reference``). These import the engine
(``voxlive``); nothing in the engine imports them, only the ``voxlive`` command does, to run them.
"""
