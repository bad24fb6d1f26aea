from conan_cli.main import app

app()
