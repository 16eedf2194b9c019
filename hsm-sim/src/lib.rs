//! hsm-sim: a PKCS#11 module that behaves like a real HSM (latency, session limits, an ops/s ceiling,
//! injected faults). Not yet populated.
