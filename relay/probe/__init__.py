"""The placement probe (`relay probe`): where each delivered pilot copy was filed.

A daemon apart from `relay serve`: it follows the delivery log, looks into each
probed provider's mailbox (IMAP, read-only, header fields only) after each of
`placement.delays`, and writes `placement` events to `placement.log`.
"""
