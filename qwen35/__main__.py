from qwen35.cli import main

main()
