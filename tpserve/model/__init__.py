"""One rank's model math and the coordinator's model part: configs, the GPTQ format, the shard plan
and reader, parallel linears, shared layers, the llama and Gemma decoders, attention and KV cache."""
