"""The seeds' own Python examples, run against Tollgate with only their base URL changed.

Usage: seed_examples.py BASE_URL CLIENT_KEY ADMIN_KEY MODEL_FILE
Seed 003's client sends its key in a header as it always did; seed 004's client sends no
Authorization header, so its base URL carries the key: BASE_URL/k/<key>.
Exits non-zero (with the reason) when a response is not what the seed documents.
"""
import sys

import requests

base, client_key, admin_key, model_file = sys.argv[1:5]

# --- Seed 003 (djangollmapi), verbatim but for the URL -------------------------------------
key = client_key
header = {'Authorization': f'Bearer {key}', 'Content-Type': 'application/json'}
data = {'text': 'This could be any payload data the api expects.'}

response = requests.post(f'{base}/api/',
                         headers=header,
                         json=data)
print(response.content)
assert response.status_code == 200, response.content
assert isinstance(response.json()["message"], str), response.json()

# --- Seed 004 (model-configuration manager), its examples in order -------------------------
seed004 = f"{base}/k/{admin_key}"

# 1. Configure Model (the seed's own example: a remote model, stored as a configuration)
url = f"{seed004}/llm/configure_model/"
data = {
    "model_id": "example_model",
    "model_name": "gpt-3",
    "model_type": "openai",
    "model_kwargs": {
        "temperature": 0.7
    }
}
response = requests.post(url, json=data)
print(response.json())
assert response.status_code == 200 and set(response.json()) == {"config_id"}, response.json()
remote_config = response.json()["config_id"]

# The seed's own example loads as an upstream (OpenAI's API; this machine has no route there,
# so the flow below uses a local model file under the same id) ...
response = requests.post(f"{seed004}/llm/load_model/{remote_config}")
print(response.json())
assert response.status_code == 200, response.json()
assert response.json()["message"] == "Model loaded successfully", response.json()
response = requests.post(f"{seed004}/llm/unload_model/example_model")
assert response.status_code == 200, response.json()

# ... and the same flow with a local model file.
data = {
    "model_id": "example_model",
    "model_name": model_file,
    "model_type": "llama.cpp",
    "model_kwargs": {
        "temperature": 0.7
    }
}
response = requests.post(url, json=data)
config_id = response.json()["config_id"]

# 2. Load Model
url = f"{seed004}/llm/load_model/{config_id}"
response = requests.post(url)
print(response.json())
assert response.json()["message"] == "Model loaded successfully", response.json()

# 8. List Loaded Models
url = f"{seed004}/llm/loaded_models/"
response = requests.get(url)
print(response.json())
assert "example_model" in response.json(), response.json()

# 4. Perform Inference
url = f"{seed004}/llm/inference/"
data = {
    "model_id": "example_model",
    "prompt": "What is the capital of France?",
    "inference_kwargs": {
        "max_tokens": 50
    }
}
response = requests.post(url, json=data)
print(response.json())
assert response.status_code == 200 and isinstance(response.json()["response"], str), response.json()

# 5. List Model Configurations
url = f"{seed004}/llm/configurations/"
response = requests.get(url)
print(response.json())
assert [c["config_id"] for c in response.json()] == [remote_config, config_id], response.json()
assert response.json()[0] == {
    "config_id": remote_config,
    "model_id": "example_model",
    "model_name": "gpt-3",
    "model_type": "openai",
    "model_kwargs": {"temperature": 0.7},
}, response.json()

# 6. Get Model Configuration
url = f"{seed004}/llm/configuration/{config_id}"
response = requests.get(url)
print(response.json())
assert response.json()["model_name"] == model_file, response.json()

# 3. Unload Model
url = f"{seed004}/llm/unload_model/example_model"
response = requests.post(url)
print(response.json())
assert response.json() == {"message": "Model unloaded successfully"}, response.json()

# 7. Delete Model Configuration
for cid in (config_id, remote_config):
    url = f"{seed004}/llm/configuration/{cid}"
    response = requests.delete(url)
    print(response.json())
    assert response.json() == {"detail": "Configuration deleted successfully"}, response.json()

response = requests.get(f"{seed004}/llm/loaded_models/")
assert response.json() == ["smollm2"], response.json()

print("seed examples passed")
