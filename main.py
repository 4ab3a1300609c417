"The user's `python main.py train|evaluate|sanity_check|create_config|inspect_data`; also re-exports the Python API."
from fashion_json_encoder.cli import main


def __getattr__(name):  # `from main import FashionEncoderSystem` without importing torch for `main.py --help`
    if name == "FashionEncoderSystem":
        from fashion_json_encoder.system import FashionEncoderSystem
        return FashionEncoderSystem
    raise AttributeError(name)


if __name__ == "__main__": raise SystemExit(main())
