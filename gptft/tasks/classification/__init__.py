"""Text classification (the book's chapter 6): ``config`` (the job) and ``task`` (training it)."""
