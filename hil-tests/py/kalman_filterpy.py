"""Runs Kalman filter cases through filterpy for the fusion cross-check test.

stdin: JSON {"cases": [{"name", "n", "m", "u", "x0", "p0", "h", "r",
                        "steps": [{"f", "b", "q", "u", "z"}]}]}
       matrices are row-major nested lists; "z" may be null (predict-only step), "u" may be [].
stdout: JSON {"results": [{"name", "x": [[...] per step], "p": [[[...]]] per step}]}
"""
import json
import sys

import numpy as np
from filterpy.kalman import KalmanFilter


def run(case):
    n, m, u = case["n"], case["m"], case["u"]
    kf = KalmanFilter(dim_x=n, dim_z=m, dim_u=u)
    kf.x = np.array(case["x0"], dtype=float).reshape(n, 1)
    kf.P = np.array(case["p0"], dtype=float)
    kf.H = np.array(case["h"], dtype=float)
    kf.R = np.array(case["r"], dtype=float)
    xs, ps = [], []
    for st in case["steps"]:
        f = np.array(st["f"], dtype=float)
        q = np.array(st["q"], dtype=float)
        if u > 0:
            b = np.array(st["b"], dtype=float)
            kf.predict(u=np.array(st["u"], dtype=float).reshape(u, 1), B=b, F=f, Q=q)
        else:
            kf.predict(F=f, Q=q)
        if st["z"] is not None:
            kf.update(np.array(st["z"], dtype=float).reshape(m, 1))
        xs.append(kf.x.reshape(-1).tolist())
        ps.append(kf.P.tolist())
    return {"name": case["name"], "x": xs, "p": ps}


def main():
    data = json.load(sys.stdin)
    json.dump({"results": [run(c) for c in data["cases"]]}, sys.stdout)


if __name__ == "__main__":
    main()
