"""cxr: train, evaluate, explain and serve chest X-ray classifiers (NORMAL vs PNEUMONIA).

Research software, not a medical device.
"""

__version__ = "0.1.0"
