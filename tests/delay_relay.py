"""python -m tests.delay_relay LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_S

The userspace delay relay as a process (for network-namespace hosts)."""

import asyncio
import sys

from .daemon_helpers import DelayRelay


async def main(listen_host, listen_port, target_host, target_port, delay_s) -> None:
    relay = DelayRelay(target_host, int(target_port), float(delay_s))
    relay.server = await asyncio.start_server(relay._accept, listen_host, int(listen_port))
    print("relaying", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
