"""aird: did compression break a chat model's refusal direction, and can a rank-one edit repair it?"""

__version__ = "0.1.0"
