"""Runs IMU data through x-io Fusion (the `imufusion` package) for the attitude cross-check.

stdin: JSON {"samples": [{"gyro": [x, y, z] deg/s, "accel": [x, y, z] g, "dt": s}]}
stdout: JSON {"roll": [deg per sample], "pitch": [deg per sample]}
Settings: Fusion defaults (NWU convention, gain 0.5), no magnetometer.
"""
import json
import sys

import imufusion
import numpy as np


def main():
    data = json.load(sys.stdin)
    ahrs = imufusion.Ahrs()
    roll, pitch = [], []
    for s in data["samples"]:
        dt = s["dt"] if s["dt"] > 0 else 0.01
        ahrs.set_sample_period(dt)
        ahrs.update_no_magnetometer(np.array(s["gyro"], dtype=float), np.array(s["accel"], dtype=float))
        e = imufusion.quaternion_to_euler(ahrs.get_quaternion())
        roll.append(float(e[0]))
        pitch.append(float(e[1]))
    json.dump({"roll": roll, "pitch": pitch}, sys.stdout)


if __name__ == "__main__":
    main()
