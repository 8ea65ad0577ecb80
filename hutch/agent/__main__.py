from hutch.agent.main import main

main()
