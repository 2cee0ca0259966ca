"""Adapters that put an agent framework's tools behind taskbound.

Each module needs its framework installed (an optional extra, e.g.
``pip install 'taskbound[langchain]'``); importing this package needs none of them.
"""
