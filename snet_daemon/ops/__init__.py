"""Operations: heartbeat now; logging, metrics, alerts and rate limits later."""
