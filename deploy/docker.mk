# Container targets, included by the main Makefile (`include deploy/docker.mk`).
#
#   make docker-build                       build $(IMAGE_NAME):$(TAG) for $(PLATFORM)
#   make push AWS_ACCOUNT_ID=123456789012   log in to ECR, tag and push $(ECR_IMAGE)
#   make run-local                          run the image on :8080 with --env-file $(ENV_FILE)
#
# Every variable can be overridden on the command line or from the environment.

DOCKER         ?= docker
IMAGE_NAME     ?= estat-ingest
TAG            ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PLATFORM       ?= linux/amd64
AWS_REGION     ?= ap-northeast-2
AWS_ACCOUNT_ID ?=
ECR_REGISTRY   ?= $(AWS_ACCOUNT_ID).dkr.ecr.$(AWS_REGION).amazonaws.com
ECR_IMAGE      ?= $(ECR_REGISTRY)/$(IMAGE_NAME):$(TAG)
ENV_FILE       ?= .env
LOCAL_PORT     ?= 8080
# named volume for /var/lib/estat-ingest (DLQ, file sink output): survives container restarts
LOCAL_VOLUME   ?= estat-ingest-state
# docker stop waits 10 s by default, less than SHUTDOWN_TIMEOUT (25 s): give the drain its budget
STOP_TIMEOUT   ?= 40

# keep the including Makefile's default goal, wherever the include line sits
_docker_mk_default_goal := $(.DEFAULT_GOAL)

.PHONY: docker-build push run-local

docker-build:
	$(DOCKER) build --platform $(PLATFORM) -t $(IMAGE_NAME):$(TAG) .

push: docker-build
	@test -n "$(AWS_ACCOUNT_ID)" || { echo "push: set AWS_ACCOUNT_ID (and AWS_REGION, now $(AWS_REGION))" >&2; exit 2; }
	aws ecr get-login-password --region $(AWS_REGION) | $(DOCKER) login --username AWS --password-stdin $(ECR_REGISTRY)
	$(DOCKER) tag $(IMAGE_NAME):$(TAG) $(ECR_IMAGE)
	$(DOCKER) push $(ECR_IMAGE)

# Same restrictions as production: read-only root, no capabilities, no privilege escalation.
# Runs in the foreground: Ctrl-C reaches the server (SIGINT) and shows the drain.
run-local:
	@test -f $(ENV_FILE) || { echo "run-local: $(ENV_FILE) not found (create it, even empty, to run with defaults)" >&2; exit 2; }
	$(DOCKER) run --rm --name $(IMAGE_NAME) \
		--env-file $(ENV_FILE) -p $(LOCAL_PORT):8080 \
		-v $(LOCAL_VOLUME):/var/lib/estat-ingest \
		--read-only --cap-drop ALL --security-opt no-new-privileges \
		--stop-timeout $(STOP_TIMEOUT) \
		$(IMAGE_NAME):$(TAG)

.DEFAULT_GOAL := $(_docker_mk_default_goal)
