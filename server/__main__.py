"""`python -m metalake.server`: serve with settings from the environment, like `metalake serve`."""

from metalake.server.app import serve_forever
from metalake.server.config import Settings

if __name__ == "__main__":
    serve_forever(Settings.from_env())
