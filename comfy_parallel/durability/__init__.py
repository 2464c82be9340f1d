"""What lets an accepted prompt survive a crash or a stop: ``journal`` (the SQLite write-ahead queue) and
``journal_writer`` store each prompt as it is accepted, ``recovery`` queues the unfinished ones again at start,
and ``shutdown`` drains on SIGTERM.
"""
