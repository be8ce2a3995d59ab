from headstart.cli import entry_point

entry_point()
