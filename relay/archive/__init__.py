"""The archive (SPEC Part 2 "Safety net: archive and replay"): an encrypted copy of each
accepted (pilot) message, from which `relay replay` sends a group's mail again.

plan.py      which messages get an archive destination in their routing plan
store.py     the archive directory: files, the plain index, hashed recipients, purging
crypto.py    age encryption to the configured recipients; identities for reading
writer.py    the scheduler's `archive` destination: encrypt, fsync, index; daily retention
commands.py  `relay archive list|export|delete|purge`, the `relay check` capacity warning
replay.py    `relay replay`: choose the missing pairs, queue them through the spool

Layout and guarantees: docs/archive.md.
"""
