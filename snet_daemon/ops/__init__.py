"""Operations: the heartbeat, log output, and the signals operators send (SIGHUP, SIGUSR1)."""
