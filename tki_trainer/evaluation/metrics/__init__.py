"""Local `evaluate` metric modules, loaded by path (see ``scoring.py``) so that nothing is fetched from the Hub."""
