"""Curriculum fine-tuning of a vision-language model on the MMRP stages (see issue: training/).

Kept apart from ``mics_agents``: it reads the dataset builder's files, never the search code.
"""
