from fashion_json_encoder.cli import train_main

if __name__ == "__main__": raise SystemExit(train_main())
