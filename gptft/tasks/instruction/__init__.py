"""Instruction fine-tuning (the book's chapter 7): ``config`` (the job) and ``task`` (training it)."""
