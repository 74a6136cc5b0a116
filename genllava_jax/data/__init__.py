"""Data: records, templates and tokenisation, image preprocessing."""
