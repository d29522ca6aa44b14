"""Policies: adapters that turn a sampler or a VLM into something the group-relative optimizer trains.

Recipes in ``pipelines/`` build them; ``mmgrpo list`` shows, under ``policies``, the options schema each recipe's
policy takes.
"""
