# Read by the `flask` command (python-dotenv): `flask db upgrade`, `flask create-user` work as printed
# from the project root, with no FLASK_APP in the shell.
FLASK_APP=webapp
