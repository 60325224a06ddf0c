"""Many simulated devices in one process (or a few), each speaking the real device protocol.

    simulator.py   Simulator: N devices in 1..k processes, their results
    device.py      SimDevice: one simulated device (real TUF client and update machine, stand-in runtime)
    knobs.py       Knobs and per-device profiles: how the simulated fleet behaves
    mqtt_pool.py   ClientPool: many paho clients driven by one network thread
"""
