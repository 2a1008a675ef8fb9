"""A pymodbus TCP server holding known values, the peer of the Modbus system tests.

Reads a JSON spec on stdin, encodes the typed values into registers itself (with Python's
struct module: an encoder independent of Outpost's), serves them on 127.0.0.1:<port>
(port 0 picks a free one) and prints `READY <port>` on stdout once it listens. Runs until
killed.

Spec:
    {"port": 0,
     "coils": [true, false, ...],            # from address 0
     "discrete_inputs": [false, true, ...],  # from address 0
     "holding": [POINT, ...], "input": [POINT, ...],
     "holding_size": 64, "input_size": 64,  # registers served from address 0
     "holding_invalid": [15]}               # addresses that answer exception 2 (optional)

    POINT = {"address": 10, "type": "f32", "word_order": "little", "byte_order": "big",
             "value": 123.5}

Addresses beyond the served sizes answer with exception 2 (illegal data address).
"""

import asyncio
import json
import struct
import sys

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

FORMATS = {"u16": ">H", "i16": ">h", "u32": ">I", "i32": ">i", "f32": ">f", "f64": ">d"}


def encode(point):
    """Registers of one typed value in the point's word and byte order."""
    value = point["value"]
    if point["type"][0] in "ui":
        value = int(value)  # JSON numbers may come as 3.0
    raw = struct.pack(FORMATS[point["type"]], value)  # big-endian bytes A B C D...
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if point.get("word_order", "big") == "little":
        words.reverse()
    if point.get("byte_order", "big") == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def register_blocks(regs, invalid):
    """The registers as simulator blocks, leaving out the `invalid` addresses: the
    simulator answers any read that touches a gap between blocks with exception 2."""
    blocks, start = [], None
    for a in range(len(regs) + 1):
        ok = a < len(regs) and a not in invalid
        if ok and start is None:
            start = a
        elif not ok and start is not None:
            blocks.append(SimData(start, values=regs[start:a], datatype=DataType.REGISTERS))
            start = None
    return blocks


def registers(points, size):
    regs = [0] * size
    for p in points:
        for i, r in enumerate(encode(p)):
            regs[p["address"] + i] = r
    return regs


async def main():
    spec = json.load(sys.stdin)
    hr = registers(spec.get("holding", []), spec.get("holding_size", 64))
    ir = registers(spec.get("input", []), spec.get("input_size", 64))
    co = [bool(b) for b in spec.get("coils", [False])]
    di = [bool(b) for b in spec.get("discrete_inputs", [False])]
    device = SimDevice(
        id=0,  # answer every unit id
        simdata=(
            [SimData(0, values=co, datatype=DataType.BITS)],
            [SimData(0, values=di, datatype=DataType.BITS)],
            register_blocks(hr, set(spec.get("holding_invalid", []))),
            [SimData(0, values=ir, datatype=DataType.REGISTERS)],
        ),
    )
    server = ModbusTcpServer(device, address=("127.0.0.1", spec.get("port", 0)))
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    await server.serving


if __name__ == "__main__":
    asyncio.run(main())
