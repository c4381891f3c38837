"""Seed endpoint contracts: each parses its parameters into a Query, renders the Result in its
own shape and formats its errors in its own envelope. None of them touches SQL."""
