"""`python -m server`: serve with settings from the environment, like `metalake serve`."""

from server.app import serve_forever
from server.config import Settings

if __name__ == "__main__":
    serve_forever(Settings.from_env())
