from dispatchd.cli import app

app()
