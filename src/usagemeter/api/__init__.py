"""The HTTP API: the native routes and one module per seed endpoint contract."""
