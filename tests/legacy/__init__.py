"""The metadata schema before Alembic: `schema.py` and `migrations.py` verbatim from each commit
that changed either (joined into one module per commit), to build the databases those commits
left behind. Never edit them: they are the history the revisions must carry forward."""

COMMITS = ["3fde5c3", "b36eb06", "3ebedb6", "6792521", "ccae1d0", "5fa6877", "d9e6d48", "488ec04",
           "0cb2999", "1e0a265", "c04bea2"]  # oldest first
