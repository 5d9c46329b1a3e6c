"""Homes of the files one stage writes and later stages read: model files, factors.

Each artifact has one writer and one reader here, with its path and format, so a stage never
imports another stage to read what it wrote.
"""
