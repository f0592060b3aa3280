"""The FastAPI baseline: the seed's pattern done right.

FastAPI + uvicorn (uvloop, httptools), one worker, an asyncio batching queue (max batch 32,
at most 2 ms wait), the same TorchScript model under torch.inference_mode, and gc.freeze()
after start-up. It answers the OIP JSON infer route plus the metadata and config routes
that perf_analyzer reads, so both load generators can drive it.

Given an ensemble package, it glues the same steps by hand instead (`vivace bench pipeline`):
each batch runs the steps' own code one after another in process (Vivace's offline path,
`load_backend(...).run`), strings answered as JSON strings.

Run: python -m vivace.bench.baselines.fastapi_server PACKAGE_DIR --port 8001
"""

import argparse
import asyncio
import gc
import json
from pathlib import Path

MAX_BATCH = 32
MAX_WAIT_S = 0.002


def build_app(package_dir: Path):  # no postponed annotations: FastAPI inspects them
    import numpy as np
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    manifest = json.loads((package_dir / "package.json").read_text())
    torch.set_num_threads(1)
    if manifest["platform"] == "ensemble":
        from vivace.engine.backends import load_backend
        from vivace.registry.package import load_package

        steps = load_backend(load_package(package_dir))

        def run(batch):
            return steps.run([batch])
    else:
        model = torch.jit.load(str(package_dir / manifest["model_file"])).eval()

        def run(batch):
            with torch.inference_mode():
                return [model(torch.from_numpy(batch)).numpy()]
    spec_in, spec_out = manifest["inputs"][0], manifest["outputs"][0]
    features = spec_in["shape"][1]
    queue: asyncio.Queue = asyncio.Queue()
    app = FastAPI()

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await queue.get()]
            deadline = loop.time() + MAX_WAIT_S
            while len(items) < MAX_BATCH:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            outputs = run(np.concatenate([x for x, _ in items]))
            start = 0
            for x, future in items:
                future.set_result([out[start:start + len(x)] for out in outputs])
                start += len(x)

    @app.on_event("startup")
    async def start() -> None:
        asyncio.get_running_loop().create_task(batcher())
        gc.collect()
        gc.freeze()

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "fastapi-baseline", "version": "1", "extensions": []}

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        return {"name": name, "versions": ["1"], "platform": "pytorch_libtorch",
                "inputs": [spec_in], "outputs": [spec_out]}

    @app.get("/v2/models/{name}/config")
    async def model_config(name: str):
        return {"name": name, "platform": "pytorch_libtorch", "max_batch_size": MAX_BATCH,
                "input": [{"name": spec_in["name"], "data_type": "TYPE_FP32", "dims": [features]}],
                "output": [{"name": spec_out["name"], "data_type": "TYPE_FP32", "dims": [1]}]}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        body = await request.json()
        try:
            tensor = body["inputs"][0]
            rows = tensor["shape"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(rows, features)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        future = asyncio.get_running_loop().create_future()
        await queue.put((x, future))
        outputs = await future
        return {"model_name": name, "model_version": "1", "id": body.get("id"),
                "outputs": [{"name": spec["name"], "datatype": spec["datatype"], "shape": list(out.shape),
                             "data": [v.decode() for v in out.ravel()] if spec["datatype"] == "BYTES"
                             else out.reshape(-1).tolist()}
                            for spec, out in zip(manifest["outputs"], outputs)]}

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        return Response(status_code=200)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("package")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(build_app(Path(args.package)), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
