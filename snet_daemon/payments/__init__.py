"""Payments: checking that each call is paid for, and keeping the books.

Nothing here knows about transports: handlers see metadata and a method
name, storage and the chain are reached through their Protocols.
"""
