"""`python -m metalake.server`: serve with settings from the environment, like `metalake serve`."""

import argparse
import sys


def serve(_: argparse.Namespace) -> int:
    from metalake.server.app import serve_forever
    from metalake.server.config import SettingError, Settings

    try:
        settings = Settings.from_env()
    except SettingError as error:
        print(f"python -m metalake.server: {error}", file=sys.stderr)
        return 2
    serve_forever(settings)
    return 0


def main() -> int:
    # Like `metalake serve`: without the server extra, one line saying what to install.
    from metalake.cli_server import ServerNotInstalledError, server_command

    try:
        return server_command(serve)(argparse.Namespace())
    except ServerNotInstalledError as error:
        print(f"python -m metalake.server: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
